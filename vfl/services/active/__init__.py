"""The active party A: holds X_A, y, w_A, the intercept and sk_A; drives jobs."""
