"""crabsweep: Crab Step (train, attribute, suppress, retrain) as an experiment-tracked sweep."""

__version__ = "0.1.0"
