"""The tap core: reach any point of any model.

A path is resolved (`paths`), the point is watched (`graph` rebuilds graph
models, `watch` hooks layer calls), and `forward` runs the model once to
return its predictions and the watched values; `model` (`TapModel`, `Tap`)
and `extract` stand on that.
"""
