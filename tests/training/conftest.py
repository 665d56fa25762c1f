import signal

import pytest

from tests.training.recipe_runner import PREEMPTION_SIGNALS


@pytest.fixture(autouse=True)
def restore_preemption_handlers():
    """A run in this process installs its preemption handlers (and a handled signal ignores the next one):
    whatever a test leaves, the next test starts with the handlers as they were."""
    saved = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
