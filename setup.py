"""Build qfram's Cython modules; every compiler directive is here, once.  Everything else
lives in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("qfram._fast", ["qfram/_fast.pyx"], extra_compile_args=["-O2"]),
    Extension("qfram._uffd", ["qfram/_uffd.pyx"], extra_compile_args=["-O2"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "embedsignature": True, "auto_pickle": False,
                             "autotestdict": False},
    )
)
