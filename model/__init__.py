"""The one-class model: R (refiner) and D (detector) of Sabokrou et al., TNNLS 2020.

Nothing in this package imports the web stack: the server and the training worker both build on it.
"""

__version__ = "0.1.0"
