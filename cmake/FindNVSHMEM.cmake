# FindNVSHMEM.cmake -- locate NVSHMEM (host + device libraries) for flashep.
#
# Search order (the first root that holds include/nvshmem.h, lib/libnvshmem_host.so.3 and
# lib/libnvshmem_device.a wins):
#   1. NVSHMEM_ROOT   (CMake variable, then environment variable)
#   2. NVSHMEM_DIR    (CMake variable, then environment variable; an install root, or that root's
#                      lib/cmake/nvshmem folder)
#   3. the PyPI wheel nvidia-nvshmem-cu<N>, asked from ${Python_EXECUTABLE} (else ${Python3_EXECUTABLE},
#      else python3 on PATH): nvidia.nvshmem is a namespace package, so __path__[0], not __file__
#   4. CMake's default search paths (CMAKE_PREFIX_PATH, /usr, ...)
# Pin a version with find_package(NVSHMEM 3.4.5 EXACT): host and device libraries of different
# versions refuse to work together, and torch loads its own libnvshmem_host.so.3 into the process.
#
# Result variables:
#   NVSHMEM_FOUND, NVSHMEM_VERSION (e.g. 3.4.5), NVSHMEM_ROOT_DIR, NVSHMEM_INCLUDE_DIR, NVSHMEM_LIB_DIR,
#   NVSHMEM_HOST_LIBRARY (.../libnvshmem_host.so.3), NVSHMEM_DEVICE_LIBRARY (.../libnvshmem_device.a),
#   NVSHMEM_CCCL_INCLUDE_DIR (the folder holding cuda/std/tuple, which nvshmem.h includes)
# IMPORTED targets:
#   nvshmem::nvshmem_host    SHARED; libnvshmem_host.so.3 (SONAME libnvshmem_host.so.3, no unversioned
#                            symlink exists); usage requirements: NVSHMEM and CCCL include dirs
#   nvshmem::nvshmem_device  STATIC; libnvshmem_device.a: relocatable device code for the device link
#                            plus the host half of init (nvshmemi_init_thread); links nvshmem_host and
#                            ${NVSHMEM_CUDART_TARGET} (default CUDA::cudart_static; "" for none)
#   nvshmem::nvshmem         INTERFACE; both of the above
# Not finding NVSHMEM is never an error unless REQUIRED; QUIET also drops the one-line status.
# Imported targets are directory-scoped: call find_package(NVSHMEM) in the top-level CMakeLists.

include(FindPackageHandleStandardArgs)

# ---- candidate roots, in priority order --------------------------------------------------------
set(_nvshmem_roots "")
foreach(_nvshmem_var IN ITEMS NVSHMEM_ROOT NVSHMEM_DIR)
  foreach(_nvshmem_val IN ITEMS "${${_nvshmem_var}}" "$ENV{${_nvshmem_var}}")
    if(_nvshmem_val AND NOT _nvshmem_val MATCHES "-NOTFOUND$")
      list(APPEND _nvshmem_roots "${_nvshmem_val}")
      # NVSHMEM's own CMake package lives in <root>/lib/cmake/nvshmem: accept that folder too.
      get_filename_component(_nvshmem_up "${_nvshmem_val}/../../.." ABSOLUTE)
      list(APPEND _nvshmem_roots "${_nvshmem_up}")
    endif()
  endforeach()
endforeach()

if(Python_EXECUTABLE)
  set(_nvshmem_python "${Python_EXECUTABLE}")
elseif(Python3_EXECUTABLE)
  set(_nvshmem_python "${Python3_EXECUTABLE}")
else()
  find_program(NVSHMEM_PYTHON_EXECUTABLE NAMES python3 python)
  mark_as_advanced(NVSHMEM_PYTHON_EXECUTABLE)
  set(_nvshmem_python "${NVSHMEM_PYTHON_EXECUTABLE}")
endif()
if(_nvshmem_python)
  execute_process(
    COMMAND "${_nvshmem_python}" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE _nvshmem_wheel_root OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _nvshmem_py_rc ERROR_QUIET)
  if(_nvshmem_py_rc EQUAL 0 AND _nvshmem_wheel_root)
    file(TO_CMAKE_PATH "${_nvshmem_wheel_root}" _nvshmem_wheel_root)
    list(APPEND _nvshmem_roots "${_nvshmem_wheel_root}")
  endif()
endif()

# Forget earlier results when the hints change (e.g. a later -DNVSHMEM_ROOT=...); results given
# by hand on the first configure (-DNVSHMEM_INCLUDE_DIR=... etc.) are kept.
if(DEFINED _NVSHMEM_SEARCHED_ROOTS AND NOT "${_nvshmem_roots}" STREQUAL "${_NVSHMEM_SEARCHED_ROOTS}")
  unset(NVSHMEM_INCLUDE_DIR CACHE)
  unset(NVSHMEM_HOST_LIBRARY CACHE)
  unset(NVSHMEM_DEVICE_LIBRARY CACHE)
endif()
set(_NVSHMEM_SEARCHED_ROOTS "${_nvshmem_roots}" CACHE INTERNAL "roots FindNVSHMEM searched")

# ---- pick the first complete root --------------------------------------------------------------
if(NOT NVSHMEM_INCLUDE_DIR OR NOT NVSHMEM_HOST_LIBRARY OR NOT NVSHMEM_DEVICE_LIBRARY)
  foreach(_nvshmem_root IN LISTS _nvshmem_roots)
    set(_nvshmem_lib "")
    foreach(_nvshmem_libdir IN ITEMS lib lib64)
      if(EXISTS "${_nvshmem_root}/${_nvshmem_libdir}/libnvshmem_host.so.3"
         AND EXISTS "${_nvshmem_root}/${_nvshmem_libdir}/libnvshmem_device.a")
        set(_nvshmem_lib "${_nvshmem_root}/${_nvshmem_libdir}")
        break()
      endif()
    endforeach()
    if(_nvshmem_lib AND EXISTS "${_nvshmem_root}/include/nvshmem.h")
      get_filename_component(_nvshmem_inc "${_nvshmem_root}/include" ABSOLUTE)
      get_filename_component(_nvshmem_lib "${_nvshmem_lib}" ABSOLUTE)
      set(NVSHMEM_INCLUDE_DIR "${_nvshmem_inc}" CACHE PATH "NVSHMEM include directory" FORCE)
      set(NVSHMEM_HOST_LIBRARY "${_nvshmem_lib}/libnvshmem_host.so.3" CACHE FILEPATH "libnvshmem_host.so.3" FORCE)
      set(NVSHMEM_DEVICE_LIBRARY "${_nvshmem_lib}/libnvshmem_device.a" CACHE FILEPATH "libnvshmem_device.a" FORCE)
      break()
    endif()
  endforeach()
endif()

# Last resort: CMake's default paths (distribution packages put headers in include/nvshmem_<cuda>).
if(NOT NVSHMEM_INCLUDE_DIR OR NOT NVSHMEM_HOST_LIBRARY OR NOT NVSHMEM_DEVICE_LIBRARY)
  find_path(NVSHMEM_INCLUDE_DIR nvshmem.h PATH_SUFFIXES nvshmem nvshmem_13 nvshmem_12)
  find_library(NVSHMEM_HOST_LIBRARY NAMES libnvshmem_host.so.3 nvshmem_host
               PATH_SUFFIXES nvshmem nvshmem/13 nvshmem/12)
  find_library(NVSHMEM_DEVICE_LIBRARY NAMES libnvshmem_device.a
               PATH_SUFFIXES nvshmem nvshmem/13 nvshmem/12)
endif()

# ---- version -------------------------------------------------------------------------------------
unset(NVSHMEM_VERSION)
foreach(_nvshmem_vh IN ITEMS non_abi/nvshmem_version.h common/nvshmem_version.h nvshmem_version.h)
  if(NVSHMEM_INCLUDE_DIR AND EXISTS "${NVSHMEM_INCLUDE_DIR}/${_nvshmem_vh}")
    file(STRINGS "${NVSHMEM_INCLUDE_DIR}/${_nvshmem_vh}" _nvshmem_vlines
         REGEX "^#define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION +[0-9]+")
    foreach(_nvshmem_part IN ITEMS MAJOR MINOR PATCH)
      string(REGEX MATCH "NVSHMEM_VENDOR_${_nvshmem_part}_VERSION +([0-9]+)" _nvshmem_m "${_nvshmem_vlines}")
      set(_nvshmem_${_nvshmem_part} "${CMAKE_MATCH_1}")
    endforeach()
    if(NOT "${_nvshmem_MAJOR}" STREQUAL "" AND NOT "${_nvshmem_MINOR}" STREQUAL "" AND NOT "${_nvshmem_PATCH}" STREQUAL "")
      set(NVSHMEM_VERSION "${_nvshmem_MAJOR}.${_nvshmem_MINOR}.${_nvshmem_PATCH}")
      set(NVSHMEM_VERSION_MAJOR "${_nvshmem_MAJOR}")
      set(NVSHMEM_VERSION_MINOR "${_nvshmem_MINOR}")
      set(NVSHMEM_VERSION_PATCH "${_nvshmem_PATCH}")
    endif()
    break()
  endif()
endforeach()

# ---- CCCL: nvshmem.h includes <cuda/std/tuple>; nvcc finds it itself, host compilers do not ------
if(NOT CUDAToolkit_FOUND)
  find_package(CUDAToolkit QUIET)
endif()
set(_nvshmem_cuda_inc ${CUDAToolkit_INCLUDE_DIRS})
if(CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
  list(APPEND _nvshmem_cuda_inc "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}/include")
endif()
# CUDA >= 13: <cuda>/include/cccl/cuda/std/tuple; CUDA 12: <cuda>/include/cuda/std/tuple.
find_path(NVSHMEM_CCCL_INCLUDE_DIR cuda/std/tuple
          HINTS ${_nvshmem_cuda_inc} PATH_SUFFIXES cccl NO_DEFAULT_PATH)
find_path(NVSHMEM_CCCL_INCLUDE_DIR cuda/std/tuple HINTS ${_nvshmem_cuda_inc} PATH_SUFFIXES cccl)

find_package_handle_standard_args(NVSHMEM
  REQUIRED_VARS NVSHMEM_HOST_LIBRARY NVSHMEM_DEVICE_LIBRARY NVSHMEM_INCLUDE_DIR NVSHMEM_CCCL_INCLUDE_DIR
  VERSION_VAR NVSHMEM_VERSION
  REASON_FAILURE_MESSAGE
    "Set NVSHMEM_ROOT (or NVSHMEM_DIR) to an NVSHMEM install, or pip install nvidia-nvshmem-cu13==3.4.5 into the Python that CMake uses.")

if(NVSHMEM_FOUND)
  get_filename_component(NVSHMEM_LIB_DIR "${NVSHMEM_HOST_LIBRARY}" DIRECTORY)
  get_filename_component(NVSHMEM_ROOT_DIR "${NVSHMEM_INCLUDE_DIR}" DIRECTORY)
  set(NVSHMEM_INCLUDE_DIRS "${NVSHMEM_INCLUDE_DIR}" "${NVSHMEM_CCCL_INCLUDE_DIR}")
  list(REMOVE_DUPLICATES NVSHMEM_INCLUDE_DIRS)
  set(NVSHMEM_LIBRARIES "${NVSHMEM_DEVICE_LIBRARY}" "${NVSHMEM_HOST_LIBRARY}")

  if(NOT TARGET nvshmem::nvshmem_host)
    add_library(nvshmem::nvshmem_host SHARED IMPORTED)
    set_target_properties(nvshmem::nvshmem_host PROPERTIES
      IMPORTED_LOCATION "${NVSHMEM_HOST_LIBRARY}"
      IMPORTED_SONAME "libnvshmem_host.so.3"
      INTERFACE_INCLUDE_DIRECTORIES "${NVSHMEM_INCLUDE_DIRS}")
  endif()
  if(NOT TARGET nvshmem::nvshmem_device)
    # The host half of libnvshmem_device.a (nvshmemi_init_thread, collective launch) calls the CUDA
    # runtime: link the flavour the rest of the module uses (NVSHMEM_CUDART_TARGET, default
    # CUDA::cudart_static; set it to CUDA::cudart, or to "" for none) so it follows the archive.
    if(NOT DEFINED NVSHMEM_CUDART_TARGET)
      set(NVSHMEM_CUDART_TARGET CUDA::cudart_static)
    endif()
    set(_nvshmem_device_deps nvshmem::nvshmem_host)
    if(NVSHMEM_CUDART_TARGET AND TARGET ${NVSHMEM_CUDART_TARGET})
      list(APPEND _nvshmem_device_deps ${NVSHMEM_CUDART_TARGET})
    endif()
    add_library(nvshmem::nvshmem_device STATIC IMPORTED)
    set_target_properties(nvshmem::nvshmem_device PROPERTIES
      IMPORTED_LOCATION "${NVSHMEM_DEVICE_LIBRARY}"
      INTERFACE_LINK_LIBRARIES "${_nvshmem_device_deps}")
  endif()
  if(NOT TARGET nvshmem::nvshmem)
    add_library(nvshmem::nvshmem INTERFACE IMPORTED)
    set_target_properties(nvshmem::nvshmem PROPERTIES
      INTERFACE_LINK_LIBRARIES "nvshmem::nvshmem_device;nvshmem::nvshmem_host")
  endif()
endif()

mark_as_advanced(NVSHMEM_INCLUDE_DIR NVSHMEM_HOST_LIBRARY NVSHMEM_DEVICE_LIBRARY NVSHMEM_CCCL_INCLUDE_DIR)
foreach(_nvshmem_v IN ITEMS roots var val up python py py_rc wheel_root root lib libdir inc vh vlines
                            part m MAJOR MINOR PATCH cuda_inc device_deps)
  unset(_nvshmem_${_nvshmem_v})
endforeach()
