"""FLAME reader."""


def load_flame(path, dtype):
    raise NotImplementedError("FLAME reader: not yet implemented")
