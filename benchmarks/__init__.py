"""tf_jacbp's benchmark suite: every figure a ratio against stock Keras/TensorFlow in one run.

Run ``python -m benchmarks [--quick]`` from the repository root.
"""
