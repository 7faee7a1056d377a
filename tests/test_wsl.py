"""labkit.wsl and doctor's WSL rows, on the fixture machines in data/wsl/ and on variants built in tmp_path."""
import shutil

import pytest

from labkit import data_path, doctor, wsl

HEALTHY, BROKEN, LINUX = (data_path("wsl", name) for name in ("healthy-wsl2", "broken-wsl2", "linux"))
GiB = 2**30


def machine(tmp_path, fixture=HEALTHY):
    """A writable copy of a fixture machine, to change one file."""
    return shutil.copytree(fixture, tmp_path / "machine", symlinks=True)


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rows(root, **kwargs):
    return {c.name: c for c in doctor.wsl_checks(root, **kwargs)}


# ----------------------------------------------------------------------------- detection
def test_detects_wsl2_its_distro_and_interop():
    info = wsl.detect(HEALTHY)
    assert (info.is_wsl, info.version, info.distro, info.interop) == (True, 2, "Ubuntu-24.04", True)
    assert wsl.detect(BROKEN).distro == "Ubuntu-22.04"      # interop registered under the older name, WSLInterop
    assert wsl.detect(BROKEN).interop


def test_plain_linux_is_not_wsl():
    info = wsl.detect(LINUX)
    assert (info.is_wsl, info.version, info.distro, info.interop) == (False, None, None, False)
    assert info.kernel == "6.8.0-45-generic"


@pytest.mark.parametrize("kernel, version", [
    ("4.4.0-19041-Microsoft", 1),                      # WSL 1: no Linux kernel, Windows names it
    ("4.19.128-microsoft-standard", 2),                # WSL 2's first kernels, before the -WSL2 suffix
    ("5.15.167.4-microsoft-standard-WSL2", 2),
])
def test_version_from_the_kernel_name(tmp_path, kernel, version):
    write(tmp_path, "proc/sys/kernel/osrelease", kernel + "\n")
    info = wsl.detect(tmp_path, environ={})
    assert info.is_wsl and info.version == version


def test_a_custom_kernel_is_recognised_by_interop_or_distro_name(tmp_path):
    write(tmp_path, "proc/sys/kernel/osrelease", "6.9.0-custom\n")
    assert not wsl.detect(tmp_path, environ={}).is_wsl
    assert wsl.detect(tmp_path, environ={"WSL_DISTRO_NAME": "Debian"}).version == 2
    write(tmp_path, "proc/sys/fs/binfmt_misc/WSLInterop", "disabled\ninterpreter /init\n")
    info = wsl.detect(tmp_path, environ={})
    assert info.version == 2 and not info.interop          # registered but switched off


# ----------------------------------------------------------------------------- .wslconfig
@pytest.mark.parametrize("text, size", [("8GB", 8 * GiB), ("512MB", 512 * 2**20), ("8G", 8 * GiB), ("1024", 1024),
                                        ("0", 0), ("2TB", 2 * 2**40),
                                        ("8gb", None), ("8 GB", None), ("1.5GB", None), ("", None), ("8GiB", None)])
def test_sizes_are_read_as_wsl_reads_them(text, size):
    assert wsl.parse_size(text) == size


def test_healthy_wslconfig_is_found_by_listing_the_profiles_and_read():
    path = wsl.find_wslconfig(HEALTHY)              # ada and Public: Public is not a person's profile
    assert path == HEALTHY / "mnt/c/Users/ada/.wslconfig"
    config = wsl.read_wslconfig(path)
    assert config.found and not config.problems
    assert (config.memory_bytes, config.processors, config.swap_bytes) == (24 * GiB, 12, 8 * GiB)
    assert config.localhost_forwarding and config.networking_mode == "nat" and config.localhost_reaches_wsl
    assert config.settings["localhostForwarding"].value is None and "true" in str(config.settings["localhostForwarding"])


def test_userprofile_finds_the_file_among_several_profiles():
    assert wsl.find_wslconfig(BROKEN, environ={}) is None               # ken and admin: ambiguous
    expected = BROKEN / "mnt/c/Users/ken/.wslconfig"
    assert wsl.find_wslconfig(BROKEN) == expected                       # USERPROFILE=C:\Users\ken (fixture environ)
    assert wsl.find_wslconfig(BROKEN, environ={"USERPROFILE": "/mnt/c/Users/ken"}) == expected   # WSLENV=USERPROFILE/p


def test_drives_mounted_elsewhere_by_wsl_conf(tmp_path):
    write(tmp_path, "etc/wsl.conf", "[automount]\nroot = /win/\n")
    write(tmp_path, "win/c/Users/mio/.wslconfig", "[wsl2]\nmemory=6GB\n")
    assert wsl.find_wslconfig(tmp_path, environ={}) == tmp_path / "win/c/Users/mio/.wslconfig"
    assert wsl.find_wslconfig(tmp_path, environ={"USERPROFILE": "C:\\Users\\mio"}) == tmp_path / "win/c/Users/mio/.wslconfig"


def test_broken_wslconfig_turns_localhost_forwarding_off():
    config = wsl.read_wslconfig(BROKEN / "mnt/c/Users/ken/.wslconfig")
    assert config.memory_bytes == 4 * GiB and config.swap_bytes is None and config.processors is None
    assert not config.localhost_forwarding and not config.localhost_reaches_wsl


def test_networking_mode_under_experimental_still_counts_and_is_pointed_to_wsl2(tmp_path):
    path = write(tmp_path, ".wslconfig", "[wsl2]\nlocalhostForwarding=false\n[experimental]\nnetworkingMode=mirrored\n")
    config = wsl.read_wslconfig(path)
    assert config.networking_mode == "mirrored" and config.settings["networkingMode"].section == "experimental"
    assert ("[experimental] networkingMode", "mirrored") == config.table()[-1][:2]
    assert config.localhost_reaches_wsl                   # mirrored: localhostForwarding is ignored
    assert any("[wsl2]" in note for note in config.notes) and any("ignored" in note for note in config.notes)


def test_wsl2_section_is_preferred_over_experimental(tmp_path):
    path = write(tmp_path, ".wslconfig", "[experimental]\nnetworkingMode=mirrored\n[WSL2]\nNetworkingMode=NAT\n")
    config = wsl.read_wslconfig(path)
    assert config.networking_mode == "nat" and any("both" in note for note in config.notes)


def test_values_wsl_ignores_are_reported_with_what_to_write(tmp_path):
    path = write(tmp_path, ".wslconfig", "[wsl2]\nmemory=8gb\nprocessors=many\nlocalhostForwarding=yes\n")
    config = wsl.read_wslconfig(path)
    assert config.memory_bytes is None and config.processors is None and config.localhost_forwarding
    assert len(config.problems) == 3
    assert "memory=8gb" in config.problems[0] and "8GB" in config.problems[0]


def test_keys_and_booleans_ignore_case_and_powershell_utf16_is_read(tmp_path):
    path = tmp_path / ".wslconfig"
    path.write_text("[WSL2]\r\nMemory=12GB  # for the 14B model\r\nLocalhostForwarding=FALSE\r\n", encoding="utf-16")
    config = wsl.read_wslconfig(path)
    assert config.memory_bytes == 12 * GiB and not config.localhost_forwarding and not config.problems


def test_no_wslconfig_means_microsofts_defaults(tmp_path):
    config = wsl.read_wslconfig(tmp_path / ".wslconfig")
    assert not config.found and config.memory_bytes is None and config.localhost_forwarding
    assert config.networking_mode == "nat" and "50%" in str(config.settings["memory"])


def test_the_vm_memory_in_force_comes_from_meminfo():
    assert wsl.vm_memory_bytes(BROKEN) == 4005424 * 1024
    assert wsl.vm_memory_bytes(LINUX / "nowhere") is None


def test_windows_and_wsl_paths_translate_both_ways():
    assert wsl.windows_to_wsl("C:\\Users\\ada") == "/mnt/c/Users/ada"
    assert wsl.windows_to_wsl("D:\\") == "/mnt/d"
    assert wsl.wsl_to_windows(HEALTHY / "mnt/c/Users/ada/.wslconfig", HEALTHY) == "C:\\Users\\ada\\.wslconfig"


# ----------------------------------------------------------------------------- the GPU driver
def test_healthy_machine_loads_windows_libcuda():
    cuda = wsl.cuda_driver(HEALTHY, environ={})
    assert "/usr/lib/wsl/lib/libcuda.so.1" in cuda.wsl_libcuda and not cuda.shadowing
    assert cuda.on_loader_path and cuda.loader_picks == "/usr/lib/wsl/lib/libcuda.so.1"


def test_a_linux_driver_shadows_windows_libcuda():
    cuda = wsl.cuda_driver(BROKEN, environ={})
    assert cuda.shadowing == ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.550.120"]
    assert cuda.loader_picks == "/usr/lib/x86_64-linux-gnu/libcuda.so.1"


def test_ld_library_path_goes_first_but_the_shadow_is_still_reported():
    cuda = wsl.cuda_driver(BROKEN, environ={"LD_LIBRARY_PATH": "/usr/lib/wsl/lib"})
    assert cuda.loader_picks == "/usr/lib/wsl/lib/libcuda.so.1" and cuda.shadowing


def test_a_link_into_wsl_lib_is_not_a_shadow(tmp_path):
    root = machine(tmp_path)
    link = root / "usr/lib/x86_64-linux-gnu/libcuda.so.1"
    link.parent.mkdir(parents=True)
    link.symlink_to("/usr/lib/wsl/lib/libcuda.so.1")          # absolute, as on a real machine: resolved inside root
    assert wsl.resolve(root, "/usr/lib/x86_64-linux-gnu/libcuda.so.1") == "/usr/lib/wsl/lib/libcuda.so.1"
    assert not wsl.cuda_driver(root, environ={}).shadowing
    link.unlink()
    link.symlink_to("libcuda.so.535.54")                        # a Linux driver's own file
    (link.parent / "libcuda.so.535.54").write_text("")
    assert "/usr/lib/x86_64-linux-gnu/libcuda.so.1" in wsl.cuda_driver(root, environ={}).shadowing


def test_loader_path_comes_from_ldconfig_or_ld_library_path():
    cache_without_wsl = "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"
    assert wsl.cuda_driver(HEALTHY, ldconfig=cache_without_wsl, environ={}).on_loader_path is False
    assert wsl.cuda_driver(HEALTHY, ldconfig=cache_without_wsl, environ={"LD_LIBRARY_PATH": "/usr/lib/wsl/lib/"}).on_loader_path
    assert wsl.cuda_driver(LINUX, environ={}).on_loader_path is None          # no ldconfig output: unknown


# ----------------------------------------------------------------------------- doctor's WSL rows
WANT = 5.0 * GiB            # about Qwen2.5-7B Q4_K_M at n_ctx=8192


def test_doctor_on_plain_linux_is_one_ok_row():
    checks = doctor.wsl_checks(LINUX)
    assert [(c.name, c.ok) for c in checks] == [("WSL", True)] and "not WSL" in checks[0].detail


def test_doctor_on_healthy_wsl2_passes_every_row():
    found = rows(HEALTHY, need_bytes=WANT, label="Qwen2.5-7B")
    assert list(found) == ["WSL", "WSL .wslconfig", "WSL memory", "WSL networking", "WSL GPU driver (libcuda)"]
    assert all(c.ok for c in found.values()), doctor.format_checks(list(found.values()))
    assert "C:\\Users\\ada\\.wslconfig" in found["WSL .wslconfig"].detail
    assert "Qwen2.5-7B needs ~5.0 GiB" in found["WSL memory"].detail


def test_doctor_says_how_to_give_the_vm_memory_for_the_model():
    memory = rows(BROKEN, need_bytes=WANT, label="Qwen2.5-7B")["WSL memory"]
    assert not memory.ok and memory.required and "3.8 GiB" in memory.detail
    assert "memory=7GB" in memory.fix and "[wsl2]" in memory.fix and "C:\\Users\\ken\\.wslconfig" in memory.fix
    assert "wsl --shutdown" in memory.fix
    assert rows(BROKEN, need_bytes=1 * GiB)["WSL memory"].ok        # a model that fits passes on the same VM


def test_doctor_explains_localhost_forwarding_off_and_the_lan():
    network = rows(BROKEN)["WSL networking"]
    assert not network.ok and not network.required and "localhostForwarding=false" in network.detail
    for words in ("localhostForwarding", "networkingMode=mirrored", "wsl --shutdown", "0.0.0.0", "API key",
                  "netsh interface portproxy"):
        assert words in network.fix, words


def test_doctor_flags_the_shadowing_linux_libcuda():
    gpu = rows(BROKEN)["WSL GPU driver (libcuda)"]
    assert not gpu.ok and not gpu.required                      # the lab runs on the CPU: a warning
    assert "/usr/lib/x86_64-linux-gnu/libcuda.so.1" in gpu.detail and "CUDA driver version is insufficient" in gpu.detail
    assert "dpkg -S /usr/lib/x86_64-linux-gnu/libcuda.so.1" in gpu.fix and "sudo ldconfig" in gpu.fix
    checks = doctor.wsl_checks(BROKEN, require_gpu=True)
    assert not doctor.passed(checks) and {c.name: c for c in checks}["WSL GPU driver (libcuda)"].required


def test_doctor_on_broken_wsl2_fails_exactly_the_broken_rows():
    found = rows(BROKEN, need_bytes=WANT)
    assert {name for name, c in found.items() if not c.ok} == {"WSL memory", "WSL networking", "WSL GPU driver (libcuda)"}
    assert not doctor.passed(list(found.values()))


def test_doctor_sees_a_wslconfig_change_not_yet_applied(tmp_path):
    root = machine(tmp_path)
    write(root, "proc/meminfo", "MemTotal:        8012345 kB\n")       # the VM still has its old 8 GB
    c = rows(root)["WSL .wslconfig"]
    assert not c.ok and "memory=24GB" in c.fix and "7.6 GiB" in c.fix and "wsl --shutdown" in c.fix


def test_doctor_reports_values_wsl_ignores(tmp_path):
    root = machine(tmp_path)
    write(root, "mnt/c/Users/ada/.wslconfig", "[wsl2]\nmemory=24gb\n")
    c = rows(root)["WSL .wslconfig"]
    assert not c.ok and "memory=24gb" in c.fix and "24GB" not in c.detail


def test_doctor_without_a_windows_profile_says_how_to_share_it():
    c = rows(BROKEN, environ={})["WSL .wslconfig"]          # two profiles, no USERPROFILE
    assert not c.ok and "WSLENV" in c.fix


def test_doctor_accepts_mirrored_networking_with_forwarding_off(tmp_path):
    root = machine(tmp_path)
    write(root, "mnt/c/Users/ada/.wslconfig", "[wsl2]\nnetworkingMode=mirrored\nlocalhostForwarding=false\n")
    found = rows(root)
    assert found["WSL networking"].ok and "mirrored" in found["WSL networking"].detail
    assert "ignored in mirrored mode" in found["WSL .wslconfig"].detail


def test_doctor_without_windows_driver_or_loader_path(tmp_path):
    root = machine(tmp_path)
    off_path = rows(root, ldconfig="", environ={})["WSL GPU driver (libcuda)"]     # an empty loader cache
    assert not off_path.ok and "ld.wsl.conf" in off_path.fix and "LD_LIBRARY_PATH" in off_path.fix
    for lib in (root / "usr/lib/wsl/lib").glob("libcuda.so*"):
        lib.unlink()
    missing = rows(root)["WSL GPU driver (libcuda)"]
    assert not missing.ok and "NVIDIA driver on Windows" in missing.fix and "wsl --update" in missing.fix


def test_doctor_on_wsl1_says_to_convert(tmp_path):
    write(tmp_path, "proc/sys/kernel/osrelease", "4.4.0-22621-Microsoft\n")
    checks = doctor.wsl_checks(tmp_path, environ={"WSL_DISTRO_NAME": "Ubuntu"})
    assert len(checks) == 1 and not checks[0].ok and "wsl --set-version Ubuntu 2" in checks[0].fix
