"""The reference's edit / text-to-image pipeline in stages: text encoding, condition image, schedule,
sampling, decoding, and where the components are placed."""
