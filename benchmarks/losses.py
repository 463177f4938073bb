"""asv suites for every loss family, generated from lossbench's registry (lossbench/integrations/asv_suite.py):
classes NLL, CE, KL, LinearCE, JSD with time_fwd_bwd, track_extra_mem_bytes and track_err_vs_floor, parametrised by
impl x shape x dtype x device. Widen the grid with LOSSBENCH_SHAPES / LOSSBENCH_DTYPES / LOSSBENCH_DEVICES, add
implementations with LOSSBENCH_PLUGIN (see the README)."""
from lossbench.integrations.asv_suite import suites as _suites

globals().update(_suites())
