"""The package version, in one place (packaging reads it too)."""

VERSION = "0.1.0"
