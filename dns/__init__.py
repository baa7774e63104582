"""The DNS resolver: per-account name policy on dnslib (see rules/)."""
