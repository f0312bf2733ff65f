"""STUN/TURN codec: messages, attributes, integrity, fingerprint, ChannelData.

Pure functions over bytes; no I/O, no clock.
"""

from turnserver.stun.attributes import ATTRIBUTE_CODECS, Address
from turnserver.stun.channeldata import (
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
    is_valid_channel_number,
)
from turnserver.stun.constants import (
    ERROR_REASONS,
    MAGIC_COOKIE,
    AddressFamily,
    Attr,
    ErrorCode,
    MessageClass,
    Method,
    PasswordAlgorithm,
    TransportProtocol,
)
from turnserver.stun.errors import StunDecodeError
from turnserver.stun.message import (
    StunMessage,
    decode_message,
    encode_attributes,
    encode_message,
    is_stun,
    long_term_key,
    userhash,
    verify_integrity,
)

__all__ = [
    "ATTRIBUTE_CODECS",
    "ERROR_REASONS",
    "MAGIC_COOKIE",
    "Address",
    "AddressFamily",
    "Attr",
    "ErrorCode",
    "MessageClass",
    "Method",
    "PasswordAlgorithm",
    "StunDecodeError",
    "StunMessage",
    "TransportProtocol",
    "decode_channel_data",
    "decode_message",
    "encode_attributes",
    "encode_channel_data",
    "encode_message",
    "is_channel_data",
    "is_stun",
    "is_valid_channel_number",
    "long_term_key",
    "userhash",
    "verify_integrity",
]
