"""The passive party B: holds X_B, w_B and sk_B; answers A's steps."""
