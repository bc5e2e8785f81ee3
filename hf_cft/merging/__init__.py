"""Task deltas and model merging: ConDU (DeltaFusionMerger), PAM and the standard baselines."""
