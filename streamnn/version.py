"""The release number, written into stores, checkpoints and run configurations."""
__version__ = "0.1.0"
