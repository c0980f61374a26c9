"""The machine: devices, their memory, and a tracker that measures what tensors cost."""
