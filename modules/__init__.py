"""The maths: every module is a LoggingModule; variants are chosen by name through registries."""
