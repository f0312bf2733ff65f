"""The one exception type the decoder raises."""


class StunDecodeError(ValueError):
    """Raised for any malformed STUN message, attribute or ChannelData frame."""
