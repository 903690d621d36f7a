"""The supernet's FFN modes, a plain enum (no torch) so the CLI can list them in --help."""

import enum


class FFNMode(str, enum.Enum):
    shared = "shared"  # plain HAT weight sharing: one matrix, sliced
    layer = "layer"  # layer-wise MoS: one router per layer mixes m experts with alpha in R^m
    neuron = "neuron"  # neuron-wise MoS: one router per matrix, alpha per output neuron
