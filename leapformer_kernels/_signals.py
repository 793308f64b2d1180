"""Stop a training loop cleanly: the zoo's ``leapformer train`` and ``lk.hf``'s transfer and
fine-tuning loops save what they trained instead of losing it to Ctrl-C."""
import signal
import threading


class StopRequest:
    """SIGINT / SIGTERM set ``signal`` (the signal's name); the loop saves what it has after the step
    under way and stops. A second signal raises KeyboardInterrupt at once. The handlers are
    installed in the main thread only and restored on exit."""

    def __init__(self):
        self.signal, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up waiting for the step to finish
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
