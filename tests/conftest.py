"""Shared pytest configuration. Fixture modules live in tests/fixtures/ and are loaded as plugins."""

pytest_plugins = ["tests.fixtures.s3"]
