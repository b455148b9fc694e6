"""The three vfl services: active (label holder), passive (feature holder), assistant (relay)."""
