"""TEST DOUBLES for the Ray backend tests (tests only): a slower OracleStandIn, so that a test can act in the middle
of a run (kill an actor, interrupt the driver). Module-level, so that Ray actors can import it."""
from __future__ import annotations

import time

from eval_doubles import OracleStandIn


class SlowStandIn(OracleStandIn):
    """OracleStandIn that takes at least `delay` seconds per item."""

    def __init__(self, annotations, threads=None, delay=0.2, **kw):
        super().__init__(annotations, threads=threads, **kw)
        self.delay = delay

    def detect_coco(self, image, **kw):
        time.sleep(self.delay)
        return super().detect_coco(image, **kw)
