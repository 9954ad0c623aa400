//! The exported NVML C functions.
//!
//! Owns the C side of the fake: symbol names and signatures (taken from
//! `nvml-wrapper-sys`, so they match what nvml-wrapper calls), handle
//! encoding, and every pointer read and write. Each function checks its
//! arguments like NVML does, then asks `state`/`model` for the answer. On a
//! GPU the order of checks is: bad handle, lost GPU, hang, feature not
//! supported, feature failing, (for writes) no permission, then the value's
//! own range checks.

// NVML's names (and bindgen's constants for its enums) are C names.
#![allow(non_upper_case_globals, non_snake_case)]

use std::{
    ffi::{CStr, c_char, c_int, c_uint, c_ulonglong},
    ptr, thread,
    time::{Duration, Instant, SystemTime},
};

use nvml_wrapper_sys::bindings::{field_id::*, *};

use crate::{
    config::Feature,
    model::{self, Gpu, MigInstance, NO_INSTANCE},
    state::{self, Fake, NvmlResult},
};

const SUCCESS: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
const INVALID_ARGUMENT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const NOT_SUPPORTED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const NOT_FOUND: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
const INSUFFICIENT_SIZE: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
const UNKNOWN: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNKNOWN;
const TIMEOUT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_TIMEOUT;
const NO_PERMISSION: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NO_PERMISSION;
const VERSION_MISMATCH: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
/// Only XID events exist in the fake.
const SUPPORTED_EVENTS: c_ulonglong = nvmlEventTypeXidCriticalError as c_ulonglong;
/// How often a waiting event set looks for news.
const EVENT_POLL: Duration = Duration::from_millis(5);

// ---- handles -------------------------------------------------------------

/// Device handles are `index + 1` dressed as pointers: never null, and
/// stable across a GPU's loss and return, as NVML's are.
fn device_handle(index: u32) -> nvmlDevice_t {
    ptr::without_provenance_mut(index as usize + 1)
}

/// MIG device handles carry this bit (above any GPU handle), then the
/// parent's index and the instance's GPU and compute instance ids: a handle
/// names one instance, and stops working when that instance is destroyed.
const MIG_HANDLE_BIT: usize = 1 << 40;

fn mig_handle(gpu: u32, gpu_instance_id: u32, compute_instance_id: u32) -> nvmlDevice_t {
    ptr::without_provenance_mut(
        MIG_HANDLE_BIT
            | (gpu as usize & 0xFF_FFFF) << 16
            | (gpu_instance_id as usize & 0xFF) << 8
            | (compute_instance_id as usize & 0xFF),
    )
}

/// What a device handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Gpu(u32),
    Mig { gpu: u32, gi: u32, ci: u32 },
}

impl Target {
    fn gpu(self) -> u32 {
        match self {
            Target::Gpu(index) | Target::Mig { gpu: index, .. } => index,
        }
    }
}

fn target(device: nvmlDevice_t) -> NvmlResult<Target> {
    let addr = device.addr();
    if addr & MIG_HANDLE_BIT != 0 {
        return Ok(Target::Mig {
            gpu: ((addr >> 16) & 0xFF_FFFF) as u32,
            gi: ((addr >> 8) & 0xFF) as u32,
            ci: (addr & 0xFF) as u32,
        });
    }
    addr.checked_sub(1)
        .and_then(|i| u32::try_from(i).ok())
        .map(Target::Gpu)
        .ok_or(INVALID_ARGUMENT)
}

/// The GPU a handle names, MIG device handles included.
fn device_index(device: nvmlDevice_t) -> NvmlResult<u32> {
    target(device).map(Target::gpu)
}

fn event_set_handle(id: usize) -> nvmlEventSet_t {
    ptr::without_provenance_mut(id)
}

// ---- pointer helpers -----------------------------------------------------

/// Writes `value` to `out`, or says INVALID_ARGUMENT for a null pointer.
///
/// # Safety
/// `out` must be null or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, and valid per the caller's contract.
    unsafe { out.write(value) };
    SUCCESS
}

/// Copies `text` and its NUL into the `length`-byte buffer `buf`.
///
/// # Safety
/// `buf` must be null or valid for `length` bytes.
unsafe fn put_str(buf: *mut c_char, length: c_uint, text: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    if text.len() + 1 > length as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the buffer holds at least text.len() + 1 bytes.
    unsafe {
        ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, text.len());
        buf.add(text.len()).write(0);
    }
    SUCCESS
}

/// Writes `text` into a fixed C char array.
fn fill(dst: &mut [c_char], text: &str) {
    for (d, s) in dst.iter_mut().zip(text.bytes().chain(std::iter::once(0))) {
        *d = s as c_char;
    }
}

/// Turns a result into a return code, writing the value on success.
///
/// # Safety
/// `out` must be null or valid for a write of `T`.
unsafe fn answer<T>(out: *mut T, result: NvmlResult<T>) -> nvmlReturn_t {
    match result {
        // SAFETY: forwarded caller contract.
        Ok(value) => unsafe { put(out, value) },
        Err(code) => code,
    }
}

fn code_of<T>(result: &NvmlResult<T>) -> nvmlReturn_t {
    result.as_ref().map_or_else(|c| *c, |_| SUCCESS)
}

// ---- the two shapes of a device call -------------------------------------

/// A read on a GPU: lost GPUs fail, hanging GPUs sleep first, unsupported
/// features say so, then `f` answers. A MIG device handle answers
/// NOT_SUPPORTED (the call is one NVML only answers on the whole GPU).
fn query<T>(
    symbol: &'static str,
    device: nvmlDevice_t,
    feature: Option<Feature>,
    f: impl FnOnce(&mut Gpu) -> NvmlResult<T>,
) -> NvmlResult<T> {
    query_any(symbol, device, feature, |gpu, instance| match instance {
        None => f(gpu),
        Some(_) => Err(NOT_SUPPORTED),
    })
}

/// As `query`, for the calls NVML also answers on a MIG device handle:
/// `f` is given the instance the handle names (`None` for the whole GPU).
/// A handle of an instance that no longer exists is INVALID_ARGUMENT.
fn query_any<T>(
    symbol: &'static str,
    device: nvmlDevice_t,
    feature: Option<Feature>,
    f: impl FnOnce(&mut Gpu, Option<&MigInstance>) -> NvmlResult<T>,
) -> NvmlResult<T> {
    let target = target(device)?;
    let index = target.gpu();
    let hang = state::with(|fake| {
        let gpu = fake.gpu(index)?;
        if let Some(code) = gpu.lost_code() {
            fake.trace(index, symbol, code);
            return Err(code);
        }
        Ok(gpu.config.hang_ms)
    })?;
    if hang > 0 {
        thread::sleep(Duration::from_millis(hang));
    }
    state::with(|fake| {
        let result = on_gpu(fake, index, feature, false, |gpu| match target {
            Target::Gpu(_) => f(gpu, None),
            Target::Mig { gi, ci, .. } => {
                let instance = gpu.mig_instance(gi, ci).cloned().ok_or(INVALID_ARGUMENT)?;
                f(gpu, Some(&instance))
            }
        });
        fake.trace(index, symbol, code_of(&result));
        result
    })
}

/// A write on a GPU: as `query`, without the hang, and refused when the
/// GPU is configured to deny writes.
fn command(
    symbol: &'static str,
    device: nvmlDevice_t,
    feature: Feature,
    f: impl FnOnce(&mut Gpu) -> nvmlReturn_t,
) -> nvmlReturn_t {
    let index = match target(device) {
        Ok(Target::Gpu(index)) => index,
        // Limits and clocks are set on the whole GPU, not on a MIG device.
        Ok(Target::Mig { .. }) => return NOT_SUPPORTED,
        Err(code) => return code,
    };
    let result = state::with(|fake| {
        let result = on_gpu(fake, index, Some(feature), true, |gpu| match f(gpu) {
            SUCCESS => Ok(()),
            code => Err(code),
        });
        fake.trace(index, symbol, code_of(&result));
        result
    });
    code_of(&result)
}

fn on_gpu<T>(
    fake: &mut Fake,
    index: u32,
    feature: Option<Feature>,
    write: bool,
    f: impl FnOnce(&mut Gpu) -> NvmlResult<T>,
) -> NvmlResult<T> {
    let gpu = fake.gpu(index)?;
    if let Some(code) = gpu.lost_code() {
        return Err(code);
    }
    if feature.is_some_and(|feat| !gpu.supports(feat)) {
        return Err(NOT_SUPPORTED);
    }
    if feature.is_some_and(|feat| gpu.fails(feat)) {
        return Err(UNKNOWN);
    }
    if write && gpu.config.no_permission_on_write {
        return Err(NO_PERMISSION);
    }
    f(gpu)
}

fn clock_mhz(gpu: &Gpu, clock: nvmlClockType_t, max: bool) -> NvmlResult<c_uint> {
    let b = &gpu.board;
    let now = gpu.snapshot();
    Ok(match (clock, max) {
        (nvmlClockType_enum_NVML_CLOCK_GRAPHICS | nvmlClockType_enum_NVML_CLOCK_SM, false) => {
            now.graphics_mhz
        }
        (nvmlClockType_enum_NVML_CLOCK_GRAPHICS | nvmlClockType_enum_NVML_CLOCK_SM, true) => {
            b.max_graphics_mhz
        }
        (nvmlClockType_enum_NVML_CLOCK_MEM, false) => now.memory_mhz,
        (nvmlClockType_enum_NVML_CLOCK_MEM, true) => b.max_memory_mhz,
        (nvmlClockType_enum_NVML_CLOCK_VIDEO, false) => now.video_mhz,
        (nvmlClockType_enum_NVML_CLOCK_VIDEO, true) => b.max_video_mhz,
        _ => return Err(INVALID_ARGUMENT),
    })
}

// ---- library and system --------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    state::init()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    state::init()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    state::shutdown()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match state::with(|fake| Ok(fake.config.driver_version.clone())) {
        // SAFETY: NVML contract: `version` holds `length` bytes.
        Ok(v) => unsafe { put_str(version, length, &v) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match state::with(|fake| Ok(fake.config.nvml_version.clone())) {
        // SAFETY: NVML contract: `version` holds `length` bytes.
        Ok(v) => unsafe { put_str(version, length, &v) },
        Err(code) => code,
    }
}

// ---- handles and identity --------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let result = state::with(|fake| Ok(fake.gpus.len() as c_uint));
    // SAFETY: NVML contract.
    unsafe { answer(count, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let result = state::with(|fake| {
        let gpu = fake.gpu(index)?;
        if let Some(code) = gpu.lost_code() {
            return Err(code);
        }
        Ok(device_handle(index))
    });
    // SAFETY: NVML contract.
    unsafe { answer(device, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if uuid.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: NVML contract: a NUL-terminated string.
    let wanted = unsafe { CStr::from_ptr(uuid) }
        .to_string_lossy()
        .into_owned();
    let result = state::with(|fake| {
        let (gpu, handle) = fake
            .gpus
            .iter()
            .find_map(|g| {
                if g.uuid == wanted {
                    return Some((g, device_handle(g.index)));
                }
                let m = g
                    .mig_enabled()
                    .then(|| g.mig.iter().find(|m| m.uuid == wanted))??;
                Some((
                    g,
                    mig_handle(g.index, m.gpu_instance_id, m.compute_instance_id),
                ))
            })
            .ok_or(NOT_FOUND)?;
        if let Some(code) = gpu.lost_code() {
            return Err(code);
        }
        Ok(handle)
    });
    // SAFETY: NVML contract.
    unsafe { answer(device, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    let result = query("nvmlDeviceGetIndex", device, None, |g| Ok(g.index));
    // SAFETY: NVML contract.
    unsafe { answer(index, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match query_any("nvmlDeviceGetName", device, None, |g, mig| {
        Ok(match mig {
            None => g.name().to_owned(),
            Some(m) => format!("{} MIG {}", g.name(), m.profile.name),
        })
    }) {
        // SAFETY: NVML contract.
        Ok(v) => unsafe { put_str(name, length, &v) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match query_any("nvmlDeviceGetUUID", device, None, |g, mig| {
        Ok(mig.map_or_else(|| g.uuid.clone(), |m| m.uuid.clone()))
    }) {
        // SAFETY: NVML contract.
        Ok(v) => unsafe { put_str(uuid, length, &v) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    let result = query("nvmlDeviceGetPciInfo_v3", device, None, |g| {
        let bus = g.pci_bus();
        let mut info = nvmlPciInfo_t {
            busIdLegacy: [0; 16],
            domain: 0,
            bus,
            device: 0,
            pciDeviceId: g.board.pci_device_id,
            pciSubSystemId: 0x1839_10DE,
            busId: [0; 32],
        };
        fill(&mut info.busIdLegacy, &format!("0000:{bus:02X}:00.0"));
        fill(&mut info.busId, &format!("00000000:{bus:02X}:00.0"));
        Ok(info)
    });
    // SAFETY: NVML contract.
    unsafe { answer(pci, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetArchitecture(
    device: nvmlDevice_t,
    arch: *mut nvmlDeviceArchitecture_t,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetArchitecture",
        device,
        Some(Feature::Architecture),
        |g| Ok(g.board.architecture),
    );
    // SAFETY: NVML contract.
    unsafe { answer(arch, result) }
}

// ---- temperatures and fan --------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetTemperature",
        device,
        Some(Feature::Temperature),
        |g| match sensor {
            nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU => Ok(g.snapshot().temperature_c),
            _ => Err(INVALID_ARGUMENT),
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(temp, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(
    device: nvmlDevice_t,
    threshold: nvmlTemperatureThresholds_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetTemperatureThreshold",
        device,
        Some(Feature::Thresholds),
        |g| match threshold {
            nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_SHUTDOWN => {
                Ok(g.board.shutdown_c)
            }
            nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_SLOWDOWN => {
                Ok(g.config.slowdown_c.unwrap_or(g.board.slowdown_c))
            }
            nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_GPU_MAX => {
                Ok(g.board.gpu_max_c)
            }
            nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_MEM_MAX
                if g.supports(Feature::MemoryTemperature) =>
            {
                Ok(g.board.memory_max_c)
            }
            t if t < nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_COUNT => {
                Err(NOT_SUPPORTED)
            }
            _ => Err(INVALID_ARGUMENT),
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(temp, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNumFans(
    device: nvmlDevice_t,
    num_fans: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetNumFans",
        device,
        Some(Feature::FanSpeed),
        |_| Ok(1),
    );
    // SAFETY: NVML contract.
    unsafe { answer(num_fans, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed_v2(
    device: nvmlDevice_t,
    fan: c_uint,
    speed: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetFanSpeed_v2",
        device,
        Some(Feature::FanSpeed),
        |g| match fan {
            0 => Ok(g.snapshot().fan_pct),
            _ => Err(INVALID_ARGUMENT),
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(speed, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed(
    device: nvmlDevice_t,
    speed: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetFanSpeed_v2(device, 0, speed) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    values_count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    let Ok(count) = usize::try_from(values_count) else {
        return INVALID_ARGUMENT;
    };
    if values.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: NVML contract: `values` holds `values_count` entries whose
    // `fieldId` (and `scopeId`) the caller filled in.
    let values = unsafe { std::slice::from_raw_parts_mut(values, count) };
    let result = query("nvmlDeviceGetFieldValues", device, None, |g| {
        let timestamp_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let now = g.snapshot();
        for v in values.iter_mut() {
            v.timestamp = timestamp_us;
            v.latencyUsec = 0;
            v.nvmlReturn = SUCCESS;
            match v.fieldId {
                NVML_FI_DEV_MEMORY_TEMP if g.supports(Feature::MemoryTemperature) => {
                    v.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT;
                    v.value.uiVal = now.memory_temperature_c;
                }
                NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION if g.supports(Feature::Energy) => {
                    v.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                    v.value.ullVal = g.energy_mj();
                }
                _ => v.nvmlReturn = NOT_SUPPORTED,
            }
        }
        Ok(())
    });
    code_of(&result)
}

// ---- power -----------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetPowerUsage",
        device,
        Some(Feature::PowerUsage),
        |g| Ok(g.snapshot().power_draw_mw),
    );
    // SAFETY: NVML contract.
    unsafe { answer(power, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetTotalEnergyConsumption",
        device,
        Some(Feature::Energy),
        |g| Ok(g.energy_mj()),
    );
    // SAFETY: NVML contract.
    unsafe { answer(energy, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetPowerManagementLimit",
        device,
        Some(Feature::PowerManagement),
        |g| Ok(g.power_limit_mw),
    );
    // SAFETY: NVML contract.
    unsafe { answer(limit, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetEnforcedPowerLimit",
        device,
        Some(Feature::PowerManagement),
        |g| Ok(g.power_limit_mw),
    );
    // SAFETY: NVML contract.
    unsafe { answer(limit, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementDefaultLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetPowerManagementDefaultLimit",
        device,
        Some(Feature::PowerManagement),
        |g| Ok(g.board.power_default_mw),
    );
    // SAFETY: NVML contract.
    unsafe { answer(limit, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimitConstraints(
    device: nvmlDevice_t,
    min_limit: *mut c_uint,
    max_limit: *mut c_uint,
) -> nvmlReturn_t {
    if min_limit.is_null() || max_limit.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query(
        "nvmlDeviceGetPowerManagementLimitConstraints",
        device,
        Some(Feature::PowerManagement),
        |g| Ok((g.board.power_min_mw, g.board.power_max_mw)),
    );
    match result {
        Ok((min, max)) => {
            // SAFETY: both checked non-null; NVML contract otherwise.
            unsafe {
                min_limit.write(min);
                max_limit.write(max);
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetPowerManagementLimit(
    device: nvmlDevice_t,
    limit: c_uint,
) -> nvmlReturn_t {
    command(
        "nvmlDeviceSetPowerManagementLimit",
        device,
        Feature::PowerManagement,
        |g| g.set_power_limit(limit),
    )
}

// ---- clocks ----------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetClockInfo",
        device,
        Some(Feature::Clocks),
        |g| clock_mhz(g, clock_type, false),
    );
    // SAFETY: NVML contract.
    unsafe { answer(clock, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetMaxClockInfo",
        device,
        Some(Feature::MaxClocks),
        |g| clock_mhz(g, clock_type, true),
    );
    // SAFETY: NVML contract.
    unsafe { answer(clock, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetApplicationsClock(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock_mhz_out: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetApplicationsClock",
        device,
        Some(Feature::ApplicationsClocks),
        |g| clock_mhz(g, clock_type, true),
    );
    // SAFETY: NVML contract.
    unsafe { answer(clock_mhz_out, result) }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceResetApplicationsClocks(device: nvmlDevice_t) -> nvmlReturn_t {
    command(
        "nvmlDeviceResetApplicationsClocks",
        device,
        Feature::ApplicationsClocks,
        |_| SUCCESS,
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetGpuLockedClocks(
    device: nvmlDevice_t,
    min_mhz: c_uint,
    max_mhz: c_uint,
) -> nvmlReturn_t {
    command(
        "nvmlDeviceSetGpuLockedClocks",
        device,
        Feature::GpuLockedClocks,
        |g| g.lock_gpu_clocks(min_mhz, max_mhz),
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceResetGpuLockedClocks(device: nvmlDevice_t) -> nvmlReturn_t {
    command(
        "nvmlDeviceResetGpuLockedClocks",
        device,
        Feature::GpuLockedClocks,
        |g| {
            g.advance();
            g.gpu_clock_lock = None;
            SUCCESS
        },
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetMemoryLockedClocks(
    device: nvmlDevice_t,
    min_mhz: c_uint,
    max_mhz: c_uint,
) -> nvmlReturn_t {
    command(
        "nvmlDeviceSetMemoryLockedClocks",
        device,
        Feature::MemoryLockedClocks,
        |g| {
            if min_mhz > max_mhz || max_mhz > g.board.max_memory_mhz {
                return INVALID_ARGUMENT;
            }
            g.memory_clock_lock = Some((min_mhz, max_mhz));
            SUCCESS
        },
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceResetMemoryLockedClocks(device: nvmlDevice_t) -> nvmlReturn_t {
    command(
        "nvmlDeviceResetMemoryLockedClocks",
        device,
        Feature::MemoryLockedClocks,
        |g| {
            g.memory_clock_lock = None;
            SUCCESS
        },
    )
}

// ---- utilisation, memory, state --------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetUtilizationRates",
        device,
        Some(Feature::Utilization),
        |g| {
            let now = g.snapshot();
            Ok(nvmlUtilization_t {
                gpu: now.utilization_gpu_pct,
                memory: now.utilization_memory_pct,
            })
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(utilization, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    if memory.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null; NVML contract: the caller set `version`.
    let version = unsafe { (*memory).version };
    let expected = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
    if version != expected {
        return VERSION_MISMATCH;
    }
    let result = query_any(
        "nvmlDeviceGetMemoryInfo_v2",
        device,
        Some(Feature::MemoryInfo),
        |g, mig| {
            let (total, reserved, used) = match mig {
                None => (
                    g.board.memory_total_bytes,
                    g.board.memory_reserved_bytes,
                    g.memory_used_bytes(),
                ),
                Some(m) => (m.memory_total_bytes(), 0, m.memory_used_bytes()),
            };
            Ok(nvmlMemory_v2_t {
                version,
                total,
                reserved,
                free: total - used,
                used,
            })
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(memory, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPerformanceState(
    device: nvmlDevice_t,
    state: *mut nvmlPstates_t,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetPerformanceState",
        device,
        Some(Feature::PerformanceState),
        |g| Ok(g.snapshot().pstate),
    );
    // SAFETY: NVML contract.
    unsafe { answer(state, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        device,
        Some(Feature::ThrottleReasons),
        |g| Ok(g.snapshot().throttle_mask),
    );
    // SAFETY: NVML contract.
    unsafe { answer(reasons, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetCurrentClocksThrottleReasons(device, reasons) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    counter: nvmlPcieUtilCounter_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetPcieThroughput",
        device,
        Some(Feature::PcieThroughput),
        |g| {
            let now = g.snapshot();
            match counter {
                nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_TX_BYTES => Ok(now.pcie_tx_kbps),
                nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_RX_BYTES => Ok(now.pcie_rx_kbps),
                _ => Err(INVALID_ARGUMENT),
            }
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(value, result) }
}

// ---- ECC and processes -------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    device: nvmlDevice_t,
    current: *mut nvmlEnableState_t,
    pending: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    if current.is_null() || pending.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query("nvmlDeviceGetEccMode", device, Some(Feature::Ecc), |_| {
        Ok(nvmlEnableState_enum_NVML_FEATURE_ENABLED)
    });
    match result {
        Ok(state) => {
            // SAFETY: both checked non-null; NVML contract otherwise.
            unsafe {
                current.write(state);
                pending.write(state);
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: nvmlMemoryErrorType_t,
    counter_type: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetTotalEccErrors",
        device,
        Some(Feature::Ecc),
        |g| {
            let ecc = g.config.ecc_errors;
            // Volatile and aggregate agree: the fake's GPUs are new.
            match (error_type, counter_type) {
                (
                    nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_CORRECTED,
                    nvmlEccCounterType_enum_NVML_VOLATILE_ECC
                    | nvmlEccCounterType_enum_NVML_AGGREGATE_ECC,
                ) => Ok(ecc.corrected),
                (
                    nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                    nvmlEccCounterType_enum_NVML_VOLATILE_ECC
                    | nvmlEccCounterType_enum_NVML_AGGREGATE_ECC,
                ) => Ok(ecc.uncorrected),
                _ => Err(INVALID_ARGUMENT),
            }
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(count, result) }
}

/// Answers a process-list query with NVML's size protocol: the count is
/// always written; a null or short buffer is INSUFFICIENT_SIZE.
///
/// # Safety
/// `info_count` must be valid for reads and writes; `infos` null or valid
/// for `*info_count` entries.
unsafe fn put_processes(
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
    result: NvmlResult<Vec<nvmlProcessInfo_t>>,
) -> nvmlReturn_t {
    let processes = match result {
        Ok(p) => p,
        Err(code) => return code,
    };
    // SAFETY: caller contract; `info_count` was checked non-null.
    unsafe {
        let room = *info_count as usize;
        info_count.write(processes.len() as c_uint);
        if processes.is_empty() {
            return SUCCESS;
        }
        if infos.is_null() || room < processes.len() {
            return INSUFFICIENT_SIZE;
        }
        ptr::copy_nonoverlapping(processes.as_ptr(), infos, processes.len());
    }
    SUCCESS
}

/// Compute processes: on the whole GPU every one (in MIG mode each with
/// its instance's ids), on a MIG device those of its instance.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    if info_count.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query_any(
        "nvmlDeviceGetComputeRunningProcesses_v3",
        device,
        Some(Feature::Processes),
        |g, mig| Ok(mig.map_or_else(|| g.compute_processes(), MigInstance::processes)),
    );
    // SAFETY: checked non-null; NVML contract for `infos`.
    unsafe { put_processes(info_count, infos, result) }
}

/// Graphics processes (none inside MIG instances).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    if info_count.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query_any(
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        device,
        Some(Feature::GraphicsProcesses),
        |g, mig| {
            Ok(match mig {
                None => g.graphics_processes(),
                Some(_) => Vec::new(),
            })
        },
    );
    // SAFETY: checked non-null; NVML contract for `infos`.
    unsafe { put_processes(info_count, infos, result) }
}

/// Process utilisation samples newer than `last_seen_us`. NVML's protocol:
/// NOT_FOUND when there is none, INSUFFICIENT_SIZE (with the count) for a
/// null or short buffer. Not supported in MIG mode, as on real GPUs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    sample_count: *mut c_uint,
    last_seen_us: c_ulonglong,
) -> nvmlReturn_t {
    if sample_count.is_null() {
        return INVALID_ARGUMENT;
    }
    let now_us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let result = query(
        "nvmlDeviceGetProcessUtilization",
        device,
        Some(Feature::ProcessUtilization),
        |g| {
            if g.mig_enabled() {
                return Err(NOT_SUPPORTED);
            }
            Ok(g.process_samples(last_seen_us, now_us))
        },
    );
    let samples = match result {
        Ok(s) => s,
        Err(code) => return code,
    };
    // SAFETY: checked non-null; NVML contract: `utilization` is null or
    // holds `*sample_count` entries.
    unsafe {
        let room = *sample_count as usize;
        sample_count.write(samples.len() as c_uint);
        if samples.is_empty() {
            return NOT_FOUND;
        }
        if utilization.is_null() || room < samples.len() {
            return INSUFFICIENT_SIZE;
        }
        ptr::copy_nonoverlapping(samples.as_ptr(), utilization, samples.len());
    }
    SUCCESS
}

// ---- MIG ---------------------------------------------------------------------

fn enable_state(on: bool) -> c_uint {
    if on {
        NVML_DEVICE_MIG_ENABLE
    } else {
        NVML_DEVICE_MIG_DISABLE
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    if current.is_null() || pending.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query("nvmlDeviceGetMigMode", device, Some(Feature::Mig), |g| {
        Ok((enable_state(g.mig_enabled()), enable_state(g.mig_pending())))
    });
    match result {
        Ok((now, next)) => {
            // SAFETY: both checked non-null; NVML contract otherwise.
            unsafe {
                current.write(now);
                pending.write(next);
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

/// How many MIG devices the GPU can hold: 7 in MIG mode, 0 outside it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetMaxMigDeviceCount",
        device,
        Some(Feature::Mig),
        |g| {
            Ok(if g.mig_enabled() {
                model::MAX_MIG_DEVICES
            } else {
                0
            })
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(count, result) }
}

/// The `index`-th MIG device (in GPU instance id order): INVALID_ARGUMENT
/// past the maximum count, NOT_FOUND for an index no instance fills.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetMigDeviceHandleByIndex",
        device,
        Some(Feature::Mig),
        |g| {
            if !g.mig_enabled() || index >= model::MAX_MIG_DEVICES {
                return Err(INVALID_ARGUMENT);
            }
            let m = g.mig.get(index as usize).ok_or(NOT_FOUND)?;
            Ok(mig_handle(
                g.index,
                m.gpu_instance_id,
                m.compute_instance_id,
            ))
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(mig_device, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let result = query_any(
        "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
        mig_device,
        Some(Feature::Mig),
        |g, mig| match mig {
            Some(_) => Ok(device_handle(g.index)),
            None => Err(INVALID_ARGUMENT),
        },
    );
    // SAFETY: NVML contract.
    unsafe { answer(device, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig_device: *mut c_uint,
) -> nvmlReturn_t {
    let result = query_any("nvmlDeviceIsMigDeviceHandle", device, None, |_, mig| {
        Ok(c_uint::from(mig.is_some()))
    });
    // SAFETY: NVML contract.
    unsafe { answer(is_mig_device, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    let result = query_any(
        "nvmlDeviceGetGpuInstanceId",
        device,
        Some(Feature::Mig),
        |_, mig| mig.map(|m| m.gpu_instance_id).ok_or(NOT_SUPPORTED),
    );
    // SAFETY: NVML contract.
    unsafe { answer(id, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    let result = query_any(
        "nvmlDeviceGetComputeInstanceId",
        device,
        Some(Feature::Mig),
        |_, mig| mig.map(|m| m.compute_instance_id).ok_or(NOT_SUPPORTED),
    );
    // SAFETY: NVML contract.
    unsafe { answer(id, result) }
}

/// SMs, slices and memory of the whole GPU or of a MIG device.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetAttributes_v2(
    device: nvmlDevice_t,
    attributes: *mut nvmlDeviceAttributes_t,
) -> nvmlReturn_t {
    let result = query_any("nvmlDeviceGetAttributes_v2", device, None, |g, mig| {
        let (sm, gi_slices, memory_mib) = match mig {
            Some(m) => (
                m.profile.sm_count,
                m.profile.compute_slices,
                m.profile.memory_mib,
            ),
            None => (
                g.board.sm_count,
                if g.supports(Feature::Mig) {
                    model::COMPUTE_SLICES
                } else {
                    0
                },
                g.board.memory_total_bytes >> 20,
            ),
        };
        Ok(nvmlDeviceAttributes_t {
            multiprocessorCount: sm,
            sharedCopyEngineCount: gi_slices.max(1),
            sharedDecoderCount: gi_slices.max(1),
            sharedEncoderCount: 0,
            sharedJpegCount: gi_slices.max(1),
            sharedOfaCount: 1,
            gpuInstanceSliceCount: gi_slices,
            computeInstanceSliceCount: gi_slices,
            memorySizeMB: memory_mib,
        })
    });
    // SAFETY: NVML contract.
    unsafe { answer(attributes, result) }
}

// ---- events ------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    event_types: *mut c_ulonglong,
) -> nvmlReturn_t {
    let result = query(
        "nvmlDeviceGetSupportedEventTypes",
        device,
        Some(Feature::Events),
        |_| Ok(SUPPORTED_EVENTS),
    );
    // SAFETY: NVML contract.
    unsafe { answer(event_types, result) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    let result = state::with(|fake| Ok(event_set_handle(fake.create_event_set())));
    // SAFETY: NVML contract.
    unsafe { answer(set, result) }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    code_of(&state::with(|fake| fake.free_event_set(set.addr())))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    let Ok(index) = device_index(device) else {
        return INVALID_ARGUMENT;
    };
    let result = state::with(|fake| {
        on_gpu(fake, index, Some(Feature::Events), false, |_| {
            if event_types & !SUPPORTED_EVENTS != 0 {
                Err(NOT_SUPPORTED)
            } else {
                Ok(())
            }
        })?;
        fake.register_events(set.addr(), index)
    });
    code_of(&result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    if data.is_null() {
        return INVALID_ARGUMENT;
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        match state::with(|fake| fake.next_event(set.addr())) {
            Ok(Some((gpu, xid))) => {
                let event = nvmlEventData_t {
                    device: device_handle(gpu),
                    eventType: SUPPORTED_EVENTS,
                    eventData: xid,
                    gpuInstanceId: NO_INSTANCE,
                    computeInstanceId: NO_INSTANCE,
                };
                // SAFETY: checked non-null; NVML contract otherwise.
                return unsafe { put(data, event) };
            }
            Ok(None) => {}
            Err(code) => return code,
        }
        let now = Instant::now();
        if now >= deadline {
            return TIMEOUT;
        }
        thread::sleep(EVENT_POLL.min(deadline - now));
    }
}

// ---- GPU Performance Monitoring -------------------------------------------

/// A GPM sample: the GPU it was taken on and what it saw then (`None`
/// until `nvmlGpmSampleGet` fills it).
#[derive(Debug, Default)]
struct FakeGpmSample {
    taken: Option<(u32, f64, f64)>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    if support.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query("nvmlGpmQueryDeviceSupport", device, None, |g| {
        Ok(u32::from(g.config.gpm))
    });
    match result {
        // SAFETY: NVML contract: `support` points to a writable struct.
        Ok(on) => unsafe {
            (*support).isSupportedDevice = on;
            SUCCESS
        },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    let boxed = Box::into_raw(Box::new(FakeGpmSample::default()));
    // SAFETY: NVML contract: `sample` is writable.
    unsafe { put(sample, boxed.cast()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: allocated by nvmlGpmSampleAlloc and freed once (NVML contract).
    drop(unsafe { Box::from_raw(sample.cast::<FakeGpmSample>()) });
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleGet(
    device: nvmlDevice_t,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    let result = query("nvmlGpmSampleGet", device, None, |g| {
        if !g.config.gpm {
            return Err(NOT_SUPPORTED);
        }
        let now = g.snapshot();
        Ok((
            g.index,
            f64::from(now.utilization_gpu_pct),
            f64::from(now.utilization_memory_pct),
        ))
    });
    match result {
        Ok(taken) => {
            // SAFETY: allocated by nvmlGpmSampleAlloc (NVML contract).
            unsafe { (*sample.cast::<FakeGpmSample>()).taken = Some(taken) };
            SUCCESS
        }
        Err(code) => code,
    }
}

const GPM_NAME: &std::ffi::CStr = c"fake";

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    if request.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: NVML contract: `request` points to a filled-in request.
    let request = unsafe { &mut *request };
    if request.version != NVML_GPM_METRICS_GET_VERSION
        || request.sample1.is_null()
        || request.sample2.is_null()
        || request.numMetrics as usize > request.metrics.len()
    {
        return INVALID_ARGUMENT;
    }
    // SAFETY: both allocated by nvmlGpmSampleAlloc (NVML contract).
    let (before, after) = unsafe {
        (
            (*request.sample1.cast::<FakeGpmSample>()).taken,
            (*request.sample2.cast::<FakeGpmSample>()).taken,
        )
    };
    let (Some((gpu_a, ..)), Some((gpu_b, graphics, memory))) = (before, after) else {
        return INVALID_ARGUMENT;
    };
    if gpu_a != gpu_b {
        return INVALID_ARGUMENT;
    }
    for metric in &mut request.metrics[..request.numMetrics as usize] {
        let value = match metric.metricId {
            nvmlGpmMetricId_t_NVML_GPM_METRIC_GRAPHICS_UTIL => Some(graphics),
            nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL => Some(graphics / 2.0),
            nvmlGpmMetricId_t_NVML_GPM_METRIC_DRAM_BW_UTIL => Some(memory),
            _ => None,
        };
        metric.nvmlReturn = if value.is_some() {
            SUCCESS
        } else {
            NOT_SUPPORTED
        };
        metric.value = value.unwrap_or(0.0);
        let name = GPM_NAME.as_ptr().cast_mut();
        metric.metricInfo.shortName = name;
        metric.metricInfo.longName = name;
        metric.metricInfo.unit = name;
    }
    SUCCESS
}
