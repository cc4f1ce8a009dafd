"""geomfit's own .npz model format."""


def load_npz(path, dtype):
    raise NotImplementedError("npz reader: not yet implemented")
