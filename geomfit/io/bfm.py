"""Basel Face Model readers (2009 .mat, 2017/2019 .h5)."""


def load_bfm2009(path, dtype):
    raise NotImplementedError("BFM 2009 reader: not yet implemented")


def load_bfm2017(path, dtype):
    raise NotImplementedError("BFM 2017 reader: not yet implemented")
