"""Autocast rules for custom ops, with the semantics of F.linear: inside torch.autocast every
floating input (float64 excepted) is cast to the *current* autocast dtype of the device, and the
op runs with autocast off. torch.library.register_autocast fixes one dtype at registration time,
which is not what a user running bf16 one day and fp16 the next expects; hence this small rule."""
from __future__ import annotations

import torch

_lib = torch.library.Library("peftkern", "FRAGMENT")


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):  # Tensor[] arguments (multi_lora_linear's adapters)
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def register_autocast(op_name: str, op_overload, device_types=("cpu", "cuda"), keep=()) -> None:
    """Register the cast-to-current-autocast-dtype rule of peftkern::<op_name> on each device type.
    `keep`: positions of arguments passed through uncast (a quantized weight's float32 block scales)."""
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(_keyset, *args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op_overload(*(a if i in keep else _cast(a, _device_type, dtype) for i, a in enumerate(args)))

        _lib.impl(op_name, kernel, key_name, with_keyset=True)
