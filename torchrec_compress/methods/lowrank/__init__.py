"""Low-rank compression: AFM (PCA of what a table or layer outputs) and its SVD baseline."""
