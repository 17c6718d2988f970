"""Developer tooling, never on the data path: a throwaway PKI and the self-contained demo."""
