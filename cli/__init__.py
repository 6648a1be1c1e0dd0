"""The command line, the demo and the reports: the top floor, above sender and receiver."""
