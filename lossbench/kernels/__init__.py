"""Hand-written loss kernels, benchmarked next to torch's own implementations (one subpackage per backend)."""
