"""acsjax: start 3D medical-imaging networks from 2D-trained weights.

The public API is the short list below; see each function's docstring.
"""

from acsjax.inflate import (
    ALPHA_PROFILES,
    METHODS,
    PLANES,
    acs_to_3d,
    adapt_input_channels,
    alpha_profile,
    inflate_kernel,
    inflate_params,
    project_params,
)
from acsjax.inference import gaussian_importance_map, sliding_window_inference
from acsjax.layers import Conv
from acsjax.ops import acs_conv, acs_kernel_split, conv, soft_acs_conv
from acsjax.trees import assert_fits

__version__ = "0.1.0"

__all__ = [
    "ALPHA_PROFILES",
    "METHODS",
    "PLANES",
    "Conv",
    "acs_conv",
    "acs_kernel_split",
    "acs_to_3d",
    "adapt_input_channels",
    "alpha_profile",
    "assert_fits",
    "conv",
    "gaussian_importance_map",
    "inflate_kernel",
    "inflate_params",
    "project_params",
    "sliding_window_inference",
    "soft_acs_conv",
]
