"""otloss: differentiable optimal-transport losses for PyTorch (exact 1-D, entropic, sliced), dominance tests, AOT and PLOT.

``import otloss`` needs only torch and numpy.
"""

from otloss._validation import get_validate_args, set_validate_args
from otloss.costs import Cost, abs_pow, get_cost, hinge, least_squares, logistic, squared_hinge, zero_one
from otloss.coupling import Coupling, quantile_coupling
from otloss.diagnostics import fsd_report, quantile_function, quantile_margins
from otloss.distributed import QuantileMemory, all_gather_variable
from otloss.dominance import dominance_test, multivariate_aot_loss, rank_models, violation_ratio
from otloss.entropic import entropic_ot
from otloss.functional import aot_loss, fsd_violation, ot_h_1d
from otloss.modules import AOTLoss, FSDViolation, OTLoss
from otloss.sliced import sliced_ot
from otloss.sorting import SoftSort, hard_sort, soft_sort, torchsort_available
from otloss.tokens import PLOTLoss, PLOTOutput, TokenOTLoss, plot_loss, token_ot_loss

__version__ = "0.1.0"

__all__ = [
    "AOTLoss",
    "Cost",
    "Coupling",
    "FSDViolation",
    "OTLoss",
    "PLOTLoss",
    "PLOTOutput",
    "QuantileMemory",
    "SoftSort",
    "TokenOTLoss",
    "__version__",
    "abs_pow",
    "all_gather_variable",
    "aot_loss",
    "dominance_test",
    "entropic_ot",
    "fsd_report",
    "fsd_violation",
    "get_cost",
    "get_validate_args",
    "hard_sort",
    "hinge",
    "least_squares",
    "logistic",
    "multivariate_aot_loss",
    "ot_h_1d",
    "plot_loss",
    "quantile_coupling",
    "quantile_function",
    "quantile_margins",
    "rank_models",
    "set_validate_args",
    "sliced_ot",
    "soft_sort",
    "squared_hinge",
    "token_ot_loss",
    "torchsort_available",
    "violation_ratio",
    "zero_one",
]
