import enum, importlib.util, sys, json
spec = importlib.util.spec_from_file_location("enum_extension", sys.argv[1]); mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
class PeftType(str, enum.Enum):
    LORA = "LORA"
m = mod.extend_enum(PeftType, "TTLORA", "TTLORA")
m2 = mod.extend_enum(PeftType, "TTLORA", "TTLORA")
assert m is m2 and m is PeftType.TTLORA and PeftType("TTLORA") is m and PeftType["TTLORA"] is m
assert "TTLORA" in list(PeftType) and m == "TTLORA" and {m: 1}["TTLORA"] == 1
assert json.dumps({"t": m}) == '{"t": "TTLORA"}', json.dumps({"t": m})
assert m.value == "TTLORA" and m.name == "TTLORA" and isinstance(m, PeftType)
print(sys.version.split()[0], "ok", repr(m), str(m), f"{m}")
print(f"{PeftType.LORA}", str(PeftType.LORA))
