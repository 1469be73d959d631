"""A stand-in for the training loop's stop flag, to stop a run at a chosen step without sending a signal."""


class StopAfterSteps(dict):
    """Stands in for stop_requests()'s flag: reads as a SIGTERM once the loop has checked it `steps` times."""

    def __init__(self, steps: int):
        super().__init__(signal=None)
        self.checks_left = steps

    def __getitem__(self, key):
        self.checks_left -= 1
        return "SIGTERM" if self.checks_left < 0 else None
