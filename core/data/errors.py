"""Errors the data pipeline raises for users: each says what was wrong and what to do.

The `terarec` CLI turns any `DataError` into a one-line message and exit status 2.
"""


from terarec.core.errors import UserError


class DataError(UserError):
    """Base of every user-facing data error."""


class MalformedInputError(DataError):
    """An input line (TSV) cannot be parsed; the message names the file and line."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data directory or split is missing or holds no parquet files."""


class SchemaMismatchError(DataError):
    """A parquet file lacks a Criteo column or its label columns differ from the other files'."""


class BadDataError(DataError):
    """A parquet file cannot be decoded or holds values training must not see (NaN, nulls, labels not 0/1)."""


class OutputExistsError(DataError):
    """The output directory already holds parquet files that a new write would mix with."""


class DataArgumentError(DataError, ValueError):
    """An argument of a data function is out of range (also a ValueError for Python callers)."""
