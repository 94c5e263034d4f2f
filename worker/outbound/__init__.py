"""The outbound machinery every kind that talks to the outside world shares: the HTTP transport
(one per process), destination rules (no private networks unless allowed), circuit
breakers, signing keys and signatures. Executors and channel adapters use it; the engine and the
runner never do."""
