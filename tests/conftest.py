"""Shared test settings.

Tests run tiny models: one torch thread is as fast as two here and immune to the
straggler slow-down that multi-threaded ops suffer when the other core is busy.
"""

import torch

torch.set_num_threads(1)
