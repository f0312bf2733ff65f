"""Operations: configuration, logging, metrics, credentials API, health."""
