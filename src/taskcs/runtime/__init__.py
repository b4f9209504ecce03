"""Transport-agnostic core of taskcs: records, protocol, codec, dispatcher, transports."""
