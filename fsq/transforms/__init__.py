"""The pieces Flying Squirrel is composed of, one concern per module."""
