"""The config file's schema and the TLS material it names, loaded and checked before anything listens. No trio."""
