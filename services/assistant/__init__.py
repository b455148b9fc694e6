"""The assistant C: relays every A<->B message; holds no key, stores nothing."""
