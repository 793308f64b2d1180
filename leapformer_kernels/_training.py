"""What the training loops share (the zoo's ``leapformer train``, ``lk.hf``'s transfer and
fine-tuning): a clean stop on Ctrl-C (they save what they trained instead of losing it) and the
learning-rate schedule."""
import math
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


def warmup_cosine(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to
    ``min_ratio * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
