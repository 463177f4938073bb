"""Reports built from result DataFrames."""
