"""Real servers the end-to-end tests start on loopback: DNS for .test names, origins, git."""
