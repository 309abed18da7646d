# find_package(PithTrain) for out-of-tree plugins: imports pithtrain::core and pithtrain_add_plugin().
# Needs LibTorch's CMake package on CMAKE_PREFIX_PATH (scripts/setup.sh prints its folder).
include(CMakeFindDependencyMacro)
set(TORCH_CUDA_ARCH_LIST "9.0" CACHE STRING "CUDA architectures for Torch's CMake package")
set(CMAKE_CUDA_STANDARD 17)
find_dependency(Torch)
find_dependency(spdlog)
include(${CMAKE_CURRENT_LIST_DIR}/PithTrainTargets.cmake)
if(NOT DEFINED PITHTRAIN_PLUGIN_OUTPUT_DIR)
  set(PITHTRAIN_PLUGIN_OUTPUT_DIR ${CMAKE_BINARY_DIR})  # out of tree: plugins land in the plugin's build dir
endif()
if(NOT DEFINED PITHTRAIN_BUILD_TESTS)
  set(PITHTRAIN_BUILD_TESTS OFF)
endif()
include(${CMAKE_CURRENT_LIST_DIR}/PithtrainPlugin.cmake)
