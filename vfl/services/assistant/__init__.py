"""The assistant C: an HTTP CONNECT tunnel from A to B; holds no key, sees sizes and timing only."""
