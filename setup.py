"""geomfit: coarse-to-fine 3D face reconstruction from a single photo."""
from setuptools import setup

EXTRAS = {
    # CHOLMOD sparse Cholesky (0.4.x on systems with SuiteSparse < 7.4, 0.5.x otherwise).
    "cholmod": ["scikit-sparse"],
    # GPU backend: CuPy arrays in, CuPy arrays out; Numba CUDA kernels.
    "gpu": ["cupy-cuda12x>=13", "numba-cuda>=0.20"],
    # torch for the optional learned layer (geomfit.learned; `import geomfit` never imports torch).
    # Pin the CPU wheel yourself (pip install torch==2.13.0) if you do not want a CUDA build.
    "torch": ["torch>=2.1"],
    # Landmark detectors: dlib's 68-point predictor (offline) and face-alignment (FAN).
    "landmarks": ["dlib-bin", "face_recognition_models", "face-alignment"],
    # Other model formats (BFM 2017/2019 .h5).
    "formats": ["h5py"],
    # Sample photos for `geomfit reconstruct skimage:NAME`.
    "examples": ["scikit-image"],
    # Batches: `geomfit reconstruct DIR ... --workers N / --scheduler ADDRESS`, geomfit.reconstruct_many
    # (Dask distributed), with a progress bar (tqdm).
    "batch": ["dask[distributed]", "tqdm"],
    "dev": [
        "pytest>=7",
        "eos-py==1.5.0",
        "scikit-image",
        "h5py",
        "libigl",
        # The Numba CUDA target, exercised on CPU under NUMBA_ENABLE_CUDASIM=1.
        "numba-cuda>=0.20",
    ],
}
EXTRAS["all"] = sorted({p for k in ("cholmod", "torch", "landmarks", "formats", "examples", "batch") for p in EXTRAS[k]})

setup(
    name="geomfit",
    version="0.1.0",
    description="Coarse-to-fine 3D face reconstruction: 3DMM landmark fitting, Laplacian deformation, "
    "SH shape-from-shading, on NumPy or CuPy arrays",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["geomfit", "geomfit.io", "geomfit.kernels", "geomfit.learned"],
    # the compiled loops live in the top-level kernels/ folder and install as geomfit.kernels
    package_dir={"geomfit.kernels": "kernels"},
    # the shipped depth refiner (trained on Surrey-model shapes: non-commercial, see its LICENSE note)
    package_data={"geomfit.learned": ["weights/*.pt", "weights/*.txt"]},
    install_requires=[
        "numpy>=1.23",
        "scipy>=1.9",
        "numba>=0.57",
        "trimesh>=3.20",
        "opencv-python-headless>=4.6",
        # one BLAS thread around sparse triangular solves (geomfit.backend.one_blas_thread)
        "threadpoolctl>=3",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["geomfit=geomfit.cli:main"]},
)
