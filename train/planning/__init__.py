"""Planning a training run from the data and from the hardware.

- :mod:`train.planning.fingerprint`: what the training cases are (spacings,
  shapes, classes, intensities), read once from the data set.
- :mod:`train.planning.experiment`: nnU-Net's planning rules: target spacing,
  patch, per-stage strides and kernels, batch and class weights from a
  fingerprint, written as ``plan.json``.
- :mod:`train.planning.topology`: the per-stage strides and kernels rule.
- :mod:`train.planning.memory`: what one compiled train step needs per device.
- :mod:`train.planning.pair`: a coarse 3D teacher plus a full-resolution 2D
  student against the full-resolution 3D network, in devices.

The command is ``python -m train.plan``.
"""
