"""mitmproxy addons: thin adapters from proxy hooks to the policy engine (see rules/)."""
